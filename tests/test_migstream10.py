"""QEMU 10's main stream through the migration stream parser: a capture (tests/data/q35-10.mig.gz)
parsed whole, byte by byte and in random chunks, and where QEMU 10 puts SWITCHOVER_START.

QEMU 10.0 sends the SWITCHOVER_START command (11) when the switchover begins
(``migration_switchover_start`` in migration.c, ``qemu_savevm_maybe_send_switchover_start`` in
savevm.c), just before the iterable sections' END pieces, unless the migration property
``send-switchover-start`` is off, which ``hw_compat_9_2`` does for machine types up to 9.2.
The live test checks both sides of that rule against a real QEMU 10 (``peers.qemu_args("10")``).
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from qioc_green.migration import (
    NEED_DATA,
    Command,
    Configuration,
    RamBlocks,
    SectionEnd,
    SectionHeader,
    SectionPart,
    SectionStart,
    StreamEnd,
    StreamParser,
    expand_pages,
)

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"


def load() -> bytes:
    return gzip.decompress((DATA / "q35-10.mig.gz").read_bytes())


def parse(chunks) -> list:
    p = StreamParser()
    events = []
    for c in chunks:
        p.feed(c)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    p.close()
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def switchover_position(events: list) -> tuple[int, list]:
    """(number of SWITCHOVER_START commands, the section headers around the first one)."""
    cmds = [i for i, e in enumerate(events) if isinstance(e, Command) and e.name == "SWITCHOVER_START"]
    if not cmds:
        return 0, []
    i = cmds[0]
    before = [e for e in events[:i] if isinstance(e, SectionHeader)][-1:]
    after = [e for e in events[i:] if isinstance(e, SectionHeader)][:1]
    return len(cmds), before + after


def test_capture_whole_bytewise_and_chunked():
    data = load()
    events = parse([data])
    assert isinstance(events[1], Configuration) and events[1].machine == "pc-q35-10.0"
    assert events[-1] == StreamEnd(len(data), True)
    blocks = next(e for e in events if isinstance(e, RamBlocks))
    assert ("pc.ram", 16 << 20) in [(b.name, b.size) for b in blocks.blocks]
    ref = expand_pages(events)
    assert expand_pages(parse(data[i : i + 1] for i in range(len(data)))) == ref
    rnd = random.Random(10)
    for _ in range(3):
        cuts = sorted(rnd.sample(range(1, len(data)), 200))
        assert expand_pages(parse(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]))) == ref


def test_switchover_start_comes_once_before_the_ram_end():
    events = parse([load()])
    count, around = switchover_position(events)
    assert count == 1
    cmd = next(e for e in events if isinstance(e, Command) and e.name == "SWITCHOVER_START")
    assert (cmd.command, cmd.data) == (11, b"")
    assert [type(e) for e in around] == [SectionPart, SectionEnd]
    assert all(e.idstr == "ram" for e in around)


@pytest.mark.peers
@pytest.mark.timeout(120)
@pytest.mark.parametrize("machine,sent", [("pc-q35-10.0", True), ("pc-q35-9.2", False),
                                          ("pc-i440fx-9.2", False), ("none", True)])
def test_live_switchover_start_follows_the_machine_type(machine, sent):
    from qioc_green.migration.qemu import capture
    from tests.peers import qemu_args

    data = capture(machine, "16M", **qemu_args("10"))
    events = parse([data])
    assert isinstance(events[-1], StreamEnd)
    count, around = switchover_position(events)
    assert count == (1 if sent else 0)
    if sent:
        assert [type(e) for e in around][1:] == [SectionEnd]
    starts = [e for e in events if isinstance(e, SectionStart)]
    assert starts and starts[0].idstr == "ram"
