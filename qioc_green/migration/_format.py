"""QEMU's migration stream format: the numbers, the command table and the error type.

The format, as learnt from QEMU's ``migration/savevm.c``, ``ram.c``, ``vmstate*.c`` and
``scripts/analyze-migration.py`` and checked against streams captured from QEMU 7.2
------------------------------------------------------------------------------------------------

All integers are big-endian. ``QEVM`` (be32 0x5145564d), be32 version 3. Then, if the machine
type sends it (every current one does), the *configuration*: byte 0x07, be32 length, the machine
type name (``pc-i440fx-7.2``), then optional subsections (see below) named
``configuration/target-page-bits`` (be32), ``configuration/capabilities`` (be32 count, then per
capability a byte length and its name; only capabilities both ends must agree on are listed,
in 7.2 just ``x-ignore-shared``) and ``configuration/uuid`` (16 bytes). It has no footer.

Then a sequence of *sections*, each introduced by a type byte:

- START (0x01) and FULL (0x04): be32 section id, byte length + idstr, be32 instance id,
  be32 version id, then the section's data;
- PART (0x02) and END (0x03): be32 section id (of a section STARTed before), then data;
- after the data of every one of these four, a footer: 0x7e and the be32 section id again;
- COMMAND (0x08): be16 command, be16 length, data (open return path, ping, the postcopy
  commands, PACKAGED, ...);
- EOF (0x00): the device state is complete.

After EOF, unless the machine says ``suppress-vmdesc=on`` or postcopy is on, comes the *VM
description*: 0x06, be32 length, and that many bytes of JSON (``{"page_size": 4096, "devices":
[...]}``) describing, in stream order, each FULL section: name, instance id, and the fields the
device wrote with the number of bytes each took (``"size"``, per element; arrays of equal
elements are folded with ``"array_len"``; ``"struct"`` fields nest a description) and the
subsections it sent. The stream ends with the JSON; nothing follows it.

A *subsection* sits at the end of a vmstate's fields: 0x05, byte length + name, be32 version,
then its own fields and subsections. The loader spots one by peeking for the 0x05 byte.

Iterable sections (START, PARTs, END) come first: in 7.2 only ``ram`` for our VMs. Its data is a
run of records, each a be64 whose low bits (below the target page size, 4096 on x86) are flags
and whose high bits are an offset: MEM_SIZE 0x04 (offset = total bytes; then per block a byte
length + idstr and be64 used length, plus be64 page size when postcopy is on and the block's
page size differs from the host's, plus be64 region address with ``x-ignore-shared``), ZERO
0x02 (one fill byte follows), PAGE 0x08 (a page of data follows), each of those two preceded by a
byte length + block name unless CONTINUE 0x20 says "same block as the previous record" (which
holds across sections), EOS 0x10 (end of this section's data), MULTIFD_FLUSH 0x200 (newer QEMUs),
XBZRLE 0x40 and COMPRESS_PAGE 0x100 (encoded pages) and HOOK 0x80 (RDMA).

Device sections (FULL, and the data of any iterable section other than ``ram``) carry *no
length*: QEMU's loader knows each device's layout from its own code. That is why the description
JSON exists, and why it comes last.

Commands (QEMU_VM_COMMAND), numbered as ``enum qemu_vm_cmd`` in QEMU's ``migration/savevm.c``
(lengths from its ``mig_cmd_args``; None: variable): 1 OPEN_RETURN_PATH, 2 PING, 3
POSTCOPY_ADVISE, 4 POSTCOPY_LISTEN, 5 POSTCOPY_RUN, 6 POSTCOPY_RAM_DISCARD, 7 PACKAGED, 8
ENABLE_COLO, 9 POSTCOPY_RESUME, 10 RECV_BITMAP, 11 SWITCHOVER_START (QEMU 10). The tests check
this table against streams a real QEMU wrote (``tests/data``), not against a copy of it.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_SECTION = "ram"
RAM_VERSION = 4

class MigCommand(enum.IntEnum):
    """``QEMU_VM_COMMAND`` numbers and names, as ``enum qemu_vm_cmd`` in savevm.c."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3  # 0 or 16 bytes
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


#: required data length of each command, None when variable (``mig_cmd_args``)
_LENGTHS: dict[MigCommand, int | None] = {
    MigCommand.OPEN_RETURN_PATH: 0, MigCommand.PING: 4, MigCommand.POSTCOPY_ADVISE: None,
    MigCommand.POSTCOPY_LISTEN: 0, MigCommand.POSTCOPY_RUN: 0,
    MigCommand.POSTCOPY_RAM_DISCARD: None, MigCommand.PACKAGED: 4, MigCommand.ENABLE_COLO: 0,
    MigCommand.POSTCOPY_RESUME: 0, MigCommand.RECV_BITMAP: None, MigCommand.SWITCHOVER_START: 0,
}
#: command number -> (name, required data length or None when variable), as savevm.c
COMMANDS: dict[int, tuple[str, int | None]] = {int(c): (c.name, n) for c, n in _LENGTHS.items()}
MIG_CMD_PACKAGED = MigCommand.PACKAGED

SECTION_KINDS = {
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
}

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


class MigrationStreamError(ValueError):
    """The stream is not a well-formed QEMU migration stream (or uses what we refuse).

    ``offset`` is the stream offset the message talks about; the message starts with it.
    """

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset


class LocalProtocolError(RuntimeError):
    """Misuse of a sans-IO object by its caller (a reply with no request pending, a command
    after the end...): a bug here, not the peer's fault (h11's split of local and remote)."""


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by every sans-IO ``next_event()``/``next_message()`` here when it needs more input
#: (the stream parser, the multifd channel parser, the return-path reader, the QMP connection).
NEED_DATA: Final = NeedData.NEED_DATA
