"""Fold migration-stream events into the summary the receiver writes with ``--json`` (sans-IO).

The summary is a plain dict, ready for ``json.dump``::

    {"machine": "pc-i440fx-7.2", "complete": true, "bytes_total": 350517, "elapsed_s": 0.12,
     "described": true,
     "sections": [{"section_id": 2, "idstr": "ram", "instance_id": 0, "version_id": 4,
                   "bytes": 239000, "records": 3}, ...],
     "ram_blocks": [{"name": "pc.ram", "size": 16777216, "zero_pages": 4096,
                     "normal_pages": 0}, ...],
     "devices": ["timer", "cpu_common", ...],
     "commands": ["OPEN_RETURN_PATH", "PING"], "command_counts": {"OPEN_RETURN_PATH": 1, "PING": 1}}

Definitions: a section's ``bytes`` counts every byte of its pieces, from the type byte of each
header to the end of its footer; ``records`` is the number of pieces (START, PARTs, END, or one
FULL). A RAM page sent twice (dirtied again) counts twice. ``devices`` are the names the VM
description lists (empty when the stream has none; ``described`` tells). ``elapsed_s`` is the
caller's to measure (no clock here); ``bytes_total`` defaults to the stream bytes the events
account for, and the caller may pass what it actually received.

Bounded whatever the stream: one entry per section id and per RAM block (the parser caps both),
and commands are counted: ``commands`` lists the first 256 in stream order,
``command_counts`` counts every one by name (a stream of ten million PINGs is one number).
"""

from __future__ import annotations

from typing import Any

from ._events import (
    Command,
    Configuration,
    Event,
    RamBlocks,
    RamPages,
    SectionFooter,
    SectionHeader,
    StreamEnd,
    VmDescription,
    ZeroPages,
)

MAX_LISTED_COMMANDS = 256


class Summary:
    """Accumulates events (``add``) and renders the summary dict (``as_dict``)."""

    def __init__(self) -> None:
        self.machine: str | None = None
        self.complete = False
        self.described = False
        self.end_offset = 0
        self.sections: dict[int, dict[str, Any]] = {}
        self._open: dict[int, int] = {}  # section id -> offset of its current header
        self.ram_blocks: dict[str, dict[str, Any]] = {}
        self.devices: list[str] = []
        self.commands: list[str] = []  # the first MAX_LISTED_COMMANDS
        self.command_counts: dict[str, int] = {}

    def add(self, ev: Event) -> None:
        """Fold one event in. Cheap for the frequent ones (page runs)."""
        if isinstance(ev, RamPages):
            self.ram_blocks[ev.block]["normal_pages"] += ev.count
        elif isinstance(ev, ZeroPages):
            self.ram_blocks[ev.block]["zero_pages"] += ev.count
        elif isinstance(ev, SectionHeader):
            sec = self.sections.get(ev.section_id)
            if sec is None:
                sec = self.sections[ev.section_id] = {
                    "section_id": ev.section_id, "idstr": ev.idstr,
                    "instance_id": ev.instance_id, "version_id": ev.version_id,
                    "bytes": 0, "records": 0}
            sec["records"] += 1
            self._open[ev.section_id] = ev.offset
        elif isinstance(ev, SectionFooter):
            start = self._open.pop(ev.section_id, ev.offset)
            self.sections[ev.section_id]["bytes"] += ev.offset + 5 - start
            self.end_offset = max(self.end_offset, ev.offset + 5)
        elif isinstance(ev, RamBlocks):
            for b in ev.blocks:
                self.ram_blocks.setdefault(
                    b.name, {"name": b.name, "size": b.size, "zero_pages": 0, "normal_pages": 0})
        elif isinstance(ev, Configuration):
            self.machine = ev.machine
        elif isinstance(ev, VmDescription):
            self.devices = ev.devices
            self.described = True
        elif isinstance(ev, Command):
            counts = self.command_counts
            counts[ev.name] = counts.get(ev.name, 0) + 1
            if len(self.commands) < MAX_LISTED_COMMANDS:
                self.commands.append(ev.name)
        elif isinstance(ev, StreamEnd):
            self.complete = True
            self.described = ev.described
            self.end_offset = ev.offset

    def as_dict(self, *, elapsed_s: float | None = None,
                bytes_total: int | None = None) -> dict[str, Any]:
        """The summary as a JSON-ready dict (a fresh copy)."""
        return {
            "machine": self.machine,
            "complete": self.complete,
            "bytes_total": self.end_offset if bytes_total is None else bytes_total,
            "elapsed_s": elapsed_s,
            "described": self.described,
            "sections": [dict(s) for s in self.sections.values()],
            "ram_blocks": [dict(b) for b in self.ram_blocks.values()],
            "devices": list(self.devices),
            "commands": list(self.commands),
            "command_counts": dict(self.command_counts),
        }
