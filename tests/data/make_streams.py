#!/usr/bin/env python3
"""Regenerate the captured QEMU migration streams in this directory (needs qemu-system-x86_64).

Each is a real QEMU source, paused (-S), 16 MiB of untouched (zero) RAM, migrated with QMP
``migrate`` over loopback (``qioc_green.migration.qemu.capture``), gzip-compressed:

    pc.mig.gz               -M pc (i440fx)
    q35.mig.gz              -M q35
    none.mig.gz             -M none (RAM and little else)
    pc-nodesc.mig.gz        -M pc,suppress-vmdesc=on: no VM description JSON after EOF
    pc-ignore-shared.mig.gz -M pc with the x-ignore-shared capability: a capabilities
                            subsection in the configuration, a region address per RAM block
    cmd-return-path-7.2.mig.gz
                            -M pc with the return-path capability, relayed to a real
                            destination QEMU (which answers on the return path) while the
                            forward stream is recorded: OPEN_RETURN_PATH, PING
    cmd-postcopy-7.2.mig.gz -M pc with postcopy-ram, switched to postcopy while precopy runs
                            (relayed to a real destination the same way): POSTCOPY_ADVISE,
                            POSTCOPY_RAM_DISCARD, PACKAGED (holding POSTCOPY_LISTEN and _RUN)
    cmd-postcopy-resume-7.2.mig.gz
                            the same, with the connection cut once postcopy runs and the
                            migration recovered (migrate-recover, migrate resume=true): the
                            resumed connection only (no stream header): RECV_BITMAP per RAM
                            block, POSTCOPY_RESUME, then the rest of RAM
    cmd-colo-7.2.mig.gz     -M pc with x-colo into the sink: ENABLE_COLO, then the whole state
                            (the source is killed once it waits for a COLO secondary)
    cmd-return-path-10.0.mig.gz
                            QEMU 10.0 (``$QIOC_QEMU10``, default /opt/qioc-qemu10), its default
                            -M pc, with return-path: OPEN_RETURN_PATH, PING, SWITCHOVER_START

and the copy of pc.mig.gz that the package ships for the demo
(``qioc_green/migration/data/pc.mig.gz``). From QEMU 10.0 too, paused; the ``-M none`` ones back
their 4 MiB of RAM with ``qemu.pattern_ram`` (normal pages that compress well, every 7th page
zero), so a test can rebuild RAM and compare it:

    q35-10.mig.gz                 -M q35 (pc-q35-10.0), 16 MiB zero RAM, plain; carries the
                                  SWITCHOVER_START command 10.0 machines send at switchover
    none-multifd2.conns.gz        -M none, multifd, 2 channels, multifd-compression none
    none-multifd2-zlib.conns.gz   the same with zlib
    none-multifd2-zstd.conns.gz   the same with zstd
    none-mapped-ram.file.gz       -M none, mapped-ram capability, migrate file: (with multifd
                                  on too, 10.0.2 wrote a byte-identical file here: a paused VM's
                                  pages land at the same offsets, and no multifd packets go into
                                  a file; tests/test_mapped_ram.py migrates both live)

``*.conns.gz``: every connection of one migration, in accept order (``tests.migdata``);
``*.file.gz``: the migration file itself (sparse on disk; gzip keeps it small).

Run from the checkout: ``python -m tests.data.make_streams [NAME...]`` (needs the package
installed with ``qemu.qmp``: ``pip install -e '.[test]'``). Two captures of one VM differ in a few
bytes (clock state), so tests never pin hashes of these files.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from typing import Any

from qioc_green.migration.qemu import (
    QEMU10_DIR,
    capture,
    capture_connections,
    capture_file,
    pattern_ram,
    qemu10,
)
from tests.migdata import pack_connections

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QEMU10_ARGS: dict[str, Any] = qemu10() or {
    "binary": os.path.join(QEMU10_DIR, "usr/bin/qemu-system-x86_64")}

STREAMS: dict[str, dict[str, Any]] = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35"},
    "none": {"machine": "none"},
    "pc-nodesc": {"machine": "pc", "machine_opts": "suppress-vmdesc=on"},
    "pc-ignore-shared": {"machine": "pc", "capabilities": ["x-ignore-shared"]},
    "cmd-return-path-7.2": {"machine": "pc", "capabilities": ["return-path"], "destination": True},
    "cmd-postcopy-7.2": {"machine": "pc", "postcopy": True},
    "cmd-postcopy-resume-7.2": {"machine": "pc", "recover": True},
    "cmd-colo-7.2": {"machine": "pc", "colo": True},
    "cmd-return-path-10.0": {"machine": "pc", "capabilities": ["return-path"], "destination": True,
                             **QEMU10_ARGS},
}


PATTERN: dict[str, Any] = {"machine": "none", "mem": "4M", **QEMU10_ARGS}
MULTIFD2: dict[str, Any] = {**PATTERN, "capabilities": ["multifd"]}
#: name -> (what: "conns" with the connection count, or "file"; capture options)
STREAMS10: dict[str, tuple[str, int, dict[str, Any]]] = {
    "q35-10.mig.gz": ("conns", 1, {"machine": "q35", "mem": "16M", **QEMU10_ARGS}),
    "none-multifd2.conns.gz": ("conns", 3, {**MULTIFD2, "parameters": {"multifd-channels": 2}}),
    "none-multifd2-zlib.conns.gz": ("conns", 3, {**MULTIFD2, "parameters": {
        "multifd-channels": 2, "multifd-compression": "zlib"}}),
    "none-multifd2-zstd.conns.gz": ("conns", 3, {**MULTIFD2, "parameters": {
        "multifd-channels": 2, "multifd-compression": "zstd"}}),
    "none-mapped-ram.file.gz": ("file", 0, {**PATTERN, "capabilities": ["mapped-ram"]}),
}


def write(name: str, data: bytes) -> None:
    path = os.path.join(HERE, name)
    with open(path, "wb") as f:
        # mtime=0: regenerating an identical stream gives an identical file
        f.write(gzip.compress(data, 9, mtime=0))
    print(f"{path}: {len(data)} bytes, {os.path.getsize(path)} compressed")


def make10(name: str, tmp: str) -> None:
    what, conns, options = STREAMS10[name]
    kw = dict(options)
    if kw["machine"] == "none":
        kw["ram_file"] = os.path.join(tmp, "ram")
    if what == "conns":
        parts = capture_connections(conns, **kw)
        write(name, parts[0] if name.endswith(".mig.gz") else pack_connections(parts))
    else:
        out = os.path.join(tmp, "file")
        capture_file(out, **kw)
        with open(out, "rb") as f:
            write(name, f.read())


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="make-streams-") as tmp:
        with open(os.path.join(tmp, "ram"), "wb") as f:
            f.write(pattern_ram(4 << 20))
        for name in names or [*STREAMS, *STREAMS10]:
            if name in STREAMS10:
                make10(name, tmp)
                continue
            write(f"{name}.mig.gz", capture(mem="16M", **STREAMS[name]))
            if name == "pc":
                shipped = os.path.join(ROOT, "qioc_green", "migration", "data", "pc.mig.gz")
                shutil.copyfile(os.path.join(HERE, "pc.mig.gz"), shipped)
                print(f"{shipped}: copied from pc.mig.gz")


if __name__ == "__main__":
    main(sys.argv[1:])
